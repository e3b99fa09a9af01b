"""Export wall time and peak memory: the tiny test checkpoint and a full-vision-width few-layer checkpoint.

    python benchmarks/bench_export.py [--depth 4] [--quant q4_k_m]

Each export runs in a child process (`medrwr_edge.export.qwen.export_model`, parity off so torch inference is not
counted); peak memory is the largest resident set of that process and the converter processes it starts
(getrusage RUSAGE_CHILDREN). Needs the [export] extra and `medrwr-edge export fetch-converter` done once.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures_qwen import make_tiny_qwen25vl  # noqa: E402

CHILD = """
import sys
from medrwr_edge.export.qwen import export_model
export_model(sys.argv[1], sys.argv[2], quant=sys.argv[3], vision_int8=True, mmproj=True, parity=False)
"""


def run_export(ckpt: Path, out: Path, quant: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), quant], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"export failed: {r.stderr.strip().splitlines()[-1]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak_kib, before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4, help="vision blocks of the full-width model (the 7B has 32)")
    ap.add_argument("--quant", default="q4_k_m")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows = []
    specs = {
        "tiny (text 64, vision 32 x 4)": dict(),
        f"full vision width (1280 x {args.depth}, text 64)": dict(
            vision_hidden=1280, vision_depth=args.depth, vision_heads=16, vision_intermediate=3420,
            fullatt_block_indexes=[args.depth - 1], initializer_range=0.02),
    }
    for i, (label, kw) in enumerate(specs.items()):
        ckpt = make_tiny_qwen25vl(work / f"ckpt{i}", **kw)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e6
        wall, peak = run_export(ckpt, work / f"bundle{i}", args.quant)
        manifest = json.loads((work / f"bundle{i}" / "manifest.json").read_text())
        rows.append((label, size, wall, peak, manifest["timings_s"]))
    print(f"{'model':45s} {'weights MB':>10s} {'export s':>9s} {'peak RSS MB':>12s}  steps (s)")
    for label, size, wall, peak, steps in rows:
        print(f"{label:45s} {size:10.1f} {wall:9.1f} {peak:12.0f}  {steps}")
    print(f"(peak RSS is cumulative over runs: the second row is max(first, second)); bundles under {work}")


if __name__ == "__main__":
    main()
