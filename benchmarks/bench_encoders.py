"""Encoder throughput, measured side by side in one run.

Text: ~2,000 real ICD-10-CM descriptions (simple_icd_10_cm) through the installed MiniLM int8 encoder, with
length-bucketed batches (sorted by token count, padded per batch) vs plain batches in input order padded to the
batch maximum. Image: skimage pictures through the EfficientNet-Lite0 encoder.

    python benchmarks/bench_encoders.py [--texts 2000] [--repeats 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _best_rate(fn, count: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def icd10_texts(n: int) -> list[str]:
    import simple_icd_10_cm as cm

    codes = [c for c in cm.get_all_codes(False) if cm.is_leaf(c)]
    step = max(1, len(codes) // n)  # spread over all chapters, not just the first one
    return [cm.get_description(c) for c in codes[::step][:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from medrwr_edge import assets
    from medrwr_edge.kb_pack.encoders import load_encoder, physical_cores

    text = load_encoder(assets.default_text_encoder_dir(), prefer_gpu=True)
    texts = icd10_texts(args.texts)
    lengths = [len(e.ids) for e in text.tokenizer.encode_batch(texts)]
    text.embed(texts[:64])  # warm-up: ORT allocates arenas on first run
    bucketed = _best_rate(lambda: text.embed(texts, batch_size=args.batch_size), len(texts), args.repeats)
    plain = _best_rate(lambda: text.embed(texts, batch_size=args.batch_size, bucketed=False), len(texts), args.repeats)
    agree = float(np.min(np.sum(text.embed(texts[:256]) * text.embed(texts[:256], bucketed=False), axis=1)))

    from skimage import data

    pictures = [data.chelsea(), data.coffee(), data.astronaut(), np.repeat(data.camera()[:, :, None], 3, axis=2)]
    images = [pictures[i % len(pictures)] for i in range(args.images)]
    image = load_encoder(assets.default_image_encoder_dir(), prefer_gpu=True)
    image.embed(images[:4])
    image_rate = _best_rate(lambda: image.embed(images), len(images), args.repeats)

    print(f"provider: text={text.provider} image={image.provider}; ORT threads={physical_cores()}")
    if text.provider_note:
        print(f"note: {text.provider_note}")
    print(f"texts: {len(texts)} ICD-10-CM descriptions, tokens mean {np.mean(lengths):.1f} max {max(lengths)}; "
          f"batch size {args.batch_size}; best of {args.repeats}")
    print(f"{'encoder':<34}{'items/s':>10}")
    print(f"{'text, length-bucketed batches':<34}{bucketed:>10.1f}")
    print(f"{'text, plain padded batches':<34}{plain:>10.1f}")
    print(f"{'bucketed / plain':<34}{bucketed / plain:>10.2f}x")
    print(f"{'min cosine bucketed vs plain':<34}{agree:>10.4f}")
    print(f"{'image (224x224, EfficientNet-L0)':<34}{image_rate:>10.1f}")


if __name__ == "__main__":
    main()
