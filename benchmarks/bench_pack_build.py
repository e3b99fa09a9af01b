"""ICD-10-CM pack build throughput (goal: >= 300 texts/s on 2 cores) and where the time goes.

Phases, each timed on the same N ICD-10-CM passages (tabular order): generating the passages, embedding
(MiniLM int8 through kb_pack.encoders), hnswlib insertion and SQLite + FTS5 writing (the very functions
build.py uses). Wall time AND process CPU time are reported: on a shared machine wall time depends on the
other load, while CPU seconds per text do not, so "CPU-bound estimate" = cores / (CPU s per text) says what
an idle 2-core machine would do.

--sweep embeds a fixed sample with onnxruntime intra-op threads x batch size x length bucketing, to tell
kb_pack/encoders.py which settings to use.

    python benchmarks/bench_pack_build.py [--encoder DIR] [--n 5000 | --full] [--sweep] [--end-to-end]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Timer:
    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def _row(label: str, n: int, t: Timer, cores: int) -> str:
    est = cores * n / t.cpu if t.cpu > 0 else float("inf")
    return f"{label:<28} {t.wall:>8.1f} s wall {n / t.wall:>9.0f} /s   {t.cpu:>8.1f} s CPU   CPU-bound est. {est:>8.0f} /s"


def _encoder_dir(path):
    if path is not None:
        return Path(path)
    from medrwr_edge.assets import default_text_encoder_dir

    return Path(default_text_encoder_dir())


def _text_encoder(encoder_dir: Path, threads: int):
    from tokenizers import Tokenizer

    from medrwr_edge.kb_pack.encoders import TextEncoder, make_session, read_spec

    spec = read_spec(encoder_dir)
    session, provider, note = make_session(encoder_dir / spec.onnx_file, prefer_gpu=False, threads=threads)
    return TextEncoder(spec, session, provider, note, Tokenizer.from_file(str(encoder_dir / spec.tokenizer_file)))


def sweep(encoder_dir: Path, texts: list[str], cores: int) -> None:
    print(f"\nembedding sweep on {len(texts)} ICD-10-CM passages (texts/s; wall | CPU-bound estimate)")
    for threads in sorted({1, 2, cores}):
        encoder = _text_encoder(encoder_dir, threads)
        encoder.embed(texts[:32])  # warm-up: first run allocates and optimises
        for batch in (16, 32, 64, 128):
            for bucketed in (True, False):
                with Timer() as t:
                    encoder.embed(texts, batch_size=batch, bucketed=bucketed)
                est = min(threads, cores) * len(texts) / t.cpu
                print(f"  threads={threads} batch={batch:<3} bucketed={bucketed!s:<5} "
                      f"{len(texts) / t.wall:>7.0f} /s wall | {est:>7.0f} /s est.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, default=None, help="text encoder dir (default: installed MiniLM)")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--full", action="store_true", help="all 98,466 ICD-10-CM entries")
    parser.add_argument("--batch-size", type=int, default=256, help="texts per embed() call, as build.py")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-n", type=int, default=512)
    parser.add_argument("--end-to-end", action="store_true", help="also time build_text_pack() itself")
    args = parser.parse_args(argv)

    from medrwr_edge.kb_pack import build
    from medrwr_edge.kb_pack.encoders import load_encoder, physical_cores
    from medrwr_edge.kb_pack.icd10 import icd10_documents
    from medrwr_edge.kb_pack.pack import HnswParams

    cores = physical_cores()
    load = os.getloadavg()[0]
    print(f"{cores} physical cores, load average {load:.1f}" + ("  (machine is busy: trust the CPU-bound estimates)"
                                                               if load > cores + 0.5 else ""))
    encoder_dir = _encoder_dir(args.encoder)
    encoder = load_encoder(encoder_dir, prefer_gpu=False)
    print(f"encoder {encoder.name} ({encoder.sha256[:12]}), provider {encoder.provider}")

    with Timer() as t_docs:
        docs = list(icd10_documents(limit=None if args.full else args.n))
    n = len(docs)
    texts = [d.text for d in docs]
    tokens = [len(e.ids) for e in encoder.tokenizer.encode_batch(texts)]
    print(f"{n} ICD-10-CM passages, tokens mean {np.mean(tokens):.0f}, p90 {np.percentile(tokens, 90):.0f}, "
          f"max {max(tokens)} (truncated at {encoder.spec.max_length})\n")

    with Timer() as t_embed:
        chunks = [encoder.embed(texts[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
    vectors = np.concatenate(chunks)
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        with Timer() as t_hnsw:
            build._write_index(Path(tmp) / "index.hnsw", vectors, HnswParams())
        hashes = [build._content_sha256(d, None) for d in docs]
        with Timer() as t_sql:
            build._write_sqlite(Path(tmp) / "docs.sqlite", docs, [None] * n, hashes)
        e2e = None
        if args.end_to_end:
            with Timer() as e2e:
                build.build_text_pack(docs, Path(tmp) / "pack", encoder, name="bench", version="1", progress=False,
                                      batch_size=args.batch_size)

    total_wall = t_embed.wall + t_hnsw.wall + t_sql.wall
    print(_row("passages (icd10.py)", n, t_docs, 1))
    print(_row("embedding", n, t_embed, cores))
    print(_row("hnsw insert (1 thread)", n, t_hnsw, 1))
    print(_row("SQLite + FTS5", n, t_sql, 1))
    print(f"{'share of build wall time':<28} embedding {t_embed.wall / total_wall:.0%}, hnsw "
          f"{t_hnsw.wall / total_wall:.0%}, SQLite/FTS {t_sql.wall / total_wall:.0%}")
    cpu_est = n / (t_embed.cpu / cores + t_hnsw.cpu + t_sql.cpu)
    print(f"{'build throughput':<28} {n / total_wall:>9.0f} texts/s wall, {cpu_est:.0f} texts/s CPU-bound estimate "
          f"(goal >= 300)")
    if e2e is not None:
        print(_row("build_text_pack end-to-end", n, e2e, cores))
    if args.sweep:
        sweep(encoder_dir, texts[: args.sweep_n], cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
