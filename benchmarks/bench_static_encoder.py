"""Static (token-vector) text encoder distilled from MiniLM vs MiniLM int8 itself (issue 13), side by side in one run.

1. Pack-build embedding throughput: the quick retrieval corpus (3,898 ICD-10-CM entries, the same
   `embedding_text` a pack embeds) is built into a pack with each encoder; the encoder's `embed` calls inside
   the build are timed (wall and process CPU). The static encoder also embeds all ICD-10-CM entries (98,466).
2. The ICD-10-CM retrieval benchmark (600 committed questions) on both packs: hit@1/3/10 and MRR for
   dense / lexical / hybrid, per question kind, and the goal check (hybrid hit@3 >= 0.9 and never below the
   better single mode).

    medrwr-edge export static-encoder OUT            # distil once (≈1 min on 2 cores)
    python benchmarks/bench_static_encoder.py --static OUT [--minilm DIR] [--no-full]

"CPU-bound est." = cores x texts / CPU-seconds: what an idle machine would do, since wall time on a shared
machine depends on the other load.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medrwr_edge.bench_data import icd10_retrieval as bench  # noqa: E402
from medrwr_edge.kb_pack.encoders import load_encoder, physical_cores  # noqa: E402

GOAL_TEXTS_PER_S = 300


class TimedEncoder:
    """Wraps an encoder and adds up the wall and CPU time of its `embed` calls (everything else delegates)."""

    def __init__(self, encoder):
        self._encoder = encoder
        self.wall = self.cpu = 0.0
        self.texts = 0

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def embed(self, texts, **kw):
        w0, c0 = time.perf_counter(), time.process_time()
        out = self._encoder.embed(texts, **kw)
        self.wall += time.perf_counter() - w0
        self.cpu += time.process_time() - c0
        self.texts += len(texts)
        return out


def _speed_line(label: str, n: int, wall: float, cpu: float, cores: int) -> str:
    est = cores * n / cpu if cpu > 0 else float("inf")
    ok = "meets" if n / wall >= GOAL_TEXTS_PER_S else "below"
    return (f"{label:<44} {n:>6} texts {wall:>7.1f} s wall = {n / wall:>7.0f} texts/s ({ok} {GOAL_TEXTS_PER_S}); "
            f"{cpu:>7.1f} CPU s, CPU-bound est. {est:>7.0f} texts/s")


def _goal_lines(label: str, results) -> list[str]:
    lines = []
    for kind, s in results["hybrid"].items():
        best = max(results["dense"][kind].hit3, results["lexical"][kind].hit3)
        lines.append(f"  {label:<10} {kind:<12} hybrid hit@3 {s.hit3:.3f} vs best single {best:.3f} "
                     f"{'ok' if s.hit3 >= best - 1e-9 else 'BELOW'}")
    overall = results["hybrid"]["all"].hit3
    lines.append(f"  {label:<10} goal hybrid hit@3 >= 0.9: {overall:.3f} {'MET' if overall >= 0.9 else 'NOT MET'}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--static", type=Path, required=True, help="static encoder dir (medrwr-edge export static-encoder)")
    ap.add_argument("--minilm", type=Path, default=None, help="MiniLM encoder dir (default: installed)")
    ap.add_argument("--no-full", action="store_true", help="skip embedding all ICD-10-CM entries with the static one")
    args = ap.parse_args(argv)

    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.icd10 import default_pack_documents, icd10_documents
    from medrwr_edge.kb_pack.pack import Pack

    if args.minilm is None:
        from medrwr_edge.assets import default_text_encoder_dir

        args.minilm = Path(default_text_encoder_dir())
    cores = physical_cores()
    encoders = {"MiniLM": load_encoder(args.minilm, prefer_gpu=False), "static": load_encoder(args.static)}
    docs = [d for d in default_pack_documents() if d.metadata["chapter"] in bench.QUICK_CORPUS_CHAPTERS]
    items = bench.committed_items()
    print(f"{len(docs)} quick-corpus entries, {len(items)} committed questions, {cores} physical cores")
    print(f"MiniLM sha256 {encoders['MiniLM'].sha256[:12]}…, static sha256 {encoders['static'].sha256[:12]}…\n")

    results, speed = {}, []
    work = Path(tempfile.mkdtemp(prefix="bench-static-"))
    try:
        for label, enc in encoders.items():
            timed = TimedEncoder(enc)
            t0 = time.perf_counter()
            path = build_text_pack(docs, work / label, timed, name=f"quick-{label}", version="bench", progress=False)
            build = time.perf_counter() - t0
            speed.append(_speed_line(f"{label}: pack-build embedding", timed.texts, timed.wall, timed.cpu, cores))
            speed.append(f"{'':<44} whole pack build {build:.1f} s = {len(docs) / build:.0f} docs/s")
            t0 = time.perf_counter()
            with Pack.open(path, encoder=enc) as pack:
                results[label] = bench.evaluate(pack, items)
            speed.append(f"{'':<44} 600 questions x 3 modes searched in {time.perf_counter() - t0:.1f} s")
        if not args.no_full:
            texts = [d.embed_text or d.text for d in icd10_documents()]
            w0, c0 = time.perf_counter(), time.process_time()
            encoders["static"].embed(texts)
            speed.append(_speed_line("static: all ICD-10-CM embedding texts", len(texts), time.perf_counter() - w0,
                                     time.process_time() - c0, cores))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n".join(speed))
    table = {f"{mode} ({label})": per_kind for label, res in results.items() for mode, per_kind in res.items()}
    print("\n" + bench.format_table(table))
    print("\nhybrid vs the better single mode, hit@3, per encoder:")
    for label, res in results.items():
        print("\n".join(_goal_lines(label, res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
