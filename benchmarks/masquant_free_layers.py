"""Per-layer diagnostics of the MASQuant rows of benchmarks/masquant_free.sh (issue 17 item 2): where the
paper's free training loses the image / audio paths.  Reads the held-out diagnostics JSON that
fidelity_seeds.py writes under OUT/reports/NAME/ and prints, per row, the layer-output SQNR (local and
accumulated) of each modality and the linears with the lowest image / audio SQNR, with the divergence
of their smoothing rows from text (mean |log s_m − log s_T|).

Usage: python benchmarks/masquant_free_layers.py --out runs/fidelity w4a8_masquant-free_s0 w4a8_masquant-split-free_s0 ...
"""
import argparse
import json
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/fidelity")
ap.add_argument("names", nargs="+")
ap.add_argument("--layers", default="0,1,2,3,5,10,15,20,25,29")
args = ap.parse_args()
show = [int(i) for i in args.layers.split(",")]
for name in args.names:
    rep = json.loads(next(Path(args.out, "reports", name).glob("diagnostics-*.json")).read_text())
    print(f"\n## {name}  ({rep['sqnr_data']})")
    print("mean accumulated SQNR:", {m: round(v, 2) for m, v in rep["summary"]["mean_sqnr_accumulated"].items()})
    print("| layer | local text / image / audio | accumulated text / image / audio |")
    print("|---|---|---|")
    for lay in rep["layers"]:
        if lay["layer"] in show:
            loc = " / ".join(f"{lay['sqnr_local'].get(m, float('nan')):.1f}" for m in ("text", "image", "audio"))
            acc = " / ".join(f"{lay['sqnr_accumulated'].get(m, float('nan')):.1f}" for m in ("text", "image", "audio"))
            print(f"| {lay['layer']} | {loc} | {acc} |")
    for m in ("image", "audio"):
        lins = [(lin["sqnr"].get(m, float("inf")), lay["layer"], path, lin["sqnr"].get("text"),
                 (lin.get("smoothing_divergence") or {}).get(m))
                for lay in rep["layers"] for path, lin in lay["linears"].items()]
        lins.sort()
        print(f"lowest {m} linear SQNR (dB; text SQNR of the same linear; divergence of s_{m} from s_T):")
        for sq, li, path, tx, dv in lins[:6]:
            print(f"  layer {li:2d} {path:18s} {m} {sq:6.1f}  text {tx:6.1f}  divergence {dv}")
