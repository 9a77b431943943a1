"""Charts of the recorded op benchmarks (benchmarks/results/ops_*_h100.json).

    .venv/bin/python -m pip install matplotlib     # optional; not a package dependency
    .venv/bin/python benchmarks/plot_ops.py        # -> benchmarks/results/ops_h100.png

Left: each op's bandwidth as a fraction of the copy bandwidth measured in the same run
(Pallas kernel, the XLA path it replaces, PyTorch), on uniform IDs. Right: hashtable
keys/s on a 1.14 GB index (log scale), Pallas vs XLA, beside the random-read bound.
"""

from __future__ import annotations

import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
IMPLS = {"pallas": "Pallas", "xla_ref": "XLA", "xla_scan_unrolled": "XLA", "torch": "PyTorch",
         "torch_int32": "PyTorch"}
COLORS = {"Pallas": "#3b6fb6", "XLA": "#9a9a9a", "PyTorch": "#e07b39"}


def bandwidth_rows() -> list[tuple[str, dict[str, float]]]:
    """[(label, {impl: frac_copy})] for the chart's left panel."""
    out = []
    b = json.load(open(RESULTS / "ops_bucketize_h100.json"))
    for n in (16, 1024):
        vals = {IMPLS[r["impl"]]: r.get("gpu_frac_copy") or r["frac_copy"] for r in b["rows"]
                if r.get("n") == n and r["impl"] in IMPLS}
        out.append((f"bucketize n={n}", vals))
    wanted = {"pool": ["d64_uni_b32", "d128_uni_b32", "d64_uni_long"], "bwd": ["d64_uni"]}
    s = json.load(open(RESULTS / "ops_sparse_h100.json"))
    for section, cases in wanted.items():
        for case in cases:
            vals = {IMPLS[r["impl"]]: r["frac_copy"] for r in s["rows"]
                    if r.get("section") == section and r.get("case") == case and r["impl"] in IMPLS}
            if vals:
                out.append((f"{'gather+pool' if section == 'pool' else 'pool backward'} {case}", vals))
    u = json.load(open(RESULTS / "ops_sparse_update_h100.json"))
    for case in ("adam_d64", "adam_d128", "adagrad_d64"):
        vals = {IMPLS[r["impl"]]: r["frac_copy"] for r in u["rows"]
                if r.get("case") == case and r["impl"] in IMPLS and r.get("section") == "update"}
        if vals:
            out.append((f"sparse update {case}", vals))
    return out


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = bandwidth_rows()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
    impls = ["Pallas", "XLA", "PyTorch"]
    h = 0.27
    for i, (label, vals) in enumerate(rows):
        for j, impl in enumerate(impls):
            if impl in vals:
                ax.barh(i + (j - 1) * h, vals[impl], h, color=COLORS[impl], label=impl if i == 0 else None)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("bandwidth / measured copy bandwidth (H100)")
    ax.set_title("Sparse-path ops: fraction of copy bandwidth")
    ax.legend(loc="lower right")

    t = json.load(open(RESULTS / "ops_hashtable_h100.json"))
    cases = [("find_hit", 0.5, None), ("find_hit", 0.8, None), ("find_or_insert", 0.5, 0.5),
             ("find_or_insert", 0.8, 0.5)]
    for i, (op, load, new) in enumerate(cases):
        for j, impl in enumerate(("pallas", "xla")):
            r = [x for x in t["rows"] if x["op"] == op and x["load"] == load and x["impl"] == impl
                 and (new is None or x.get("new_frac") == new)]
            if r:
                ax2.barh(i + (j - 0.5) * 0.4, r[0]["keys_per_s"], 0.4, color=COLORS["Pallas" if impl == "pallas"
                                                                                   else "XLA"])
    bound = t["bounds"].get("find_hit_gather_bound")
    if bound:
        ax2.axvline(bound, color="k", lw=0.8, ls="--", label="random-read bound (find)")
        ax2.legend(loc="lower right")
    ax2.set_xscale("log")
    ax2.set_yticks(range(len(cases)), [f"{op} load {load}" + (f", {int(new * 100)}% new" if new else "")
                                       for op, load, new in cases])
    ax2.invert_yaxis()
    ax2.set_xlabel("keys / s (1.14 GB index, 4M keys per call)")
    ax2.set_title("Hashtable: Pallas vs XLA")
    fig.tight_layout()
    out = RESULTS / "ops_h100.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
